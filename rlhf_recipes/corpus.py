"""The quickstart's data, made from nothing: short movie reviews from a small grammar.

    python -m rlhf_recipes.corpus DIR     # writes what ships in rlhf_recipes/data/quickstart

Every review is planned once without a polarity (an opener, one to three clauses, the joins)
and rendered positive or negative by choosing each clause's adjective or phrase from one
side of a paired word list. That gives
  reviews.jsonl   texts to imitate (the SFT stage): mixed, but mostly critical;
  pairs.jsonl     one plan rendered both ways, positive chosen over negative (the reward
                  model), some cut short, some against an opening that gives no opinion;
  preferences.jsonl  the same pairs split where they part: {prompt, chosen, rejected}, the
                  prompt their shared opening (DPO's pairs, in the DPO quickstart);
  prompts.jsonl   openings of reviews, cut before their first opinion word (PPO's prompts);
  base/           a word-level tokenizer trained on the reviews, and a small GPT-2 config
                  (no weights: the SFT stage starts from random ones);
  continuations.jsonl  each review split at its first opinion word into an opening and the
                  rest (the encoder-decoder quickstart's SFT pairs: source, target);
  base_seq2seq/   the same words with T5's specials, appending </s>, and a small T5 config.
`is_positive` judges a text by its opinion words alone, independently of any model, so
the evaluation can count positive responses without trusting the reward model.
Texts are lower case with punctuation split off, so the word-level tokenizer covers them.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

QUICKSTART = Path(__file__).parent / "data" / "quickstart"
"""Where the generated files ship inside the package."""

ASPECTS = ["the acting", "the plot", "the script", "the music", "the ending", "the cast", "the director",
           "the story", "the pacing", "the dialogue", "this movie", "this film", "the soundtrack",
           "the camera work", "the lead actor", "the villain", "the effects", "the humour", "the first half",
           "the last scene", "the photography", "the editing"]
VERBS = ["was", "is", "felt", "seemed", "was really", "was quite", "was truly", "looked", "was simply"]
# (positive, negative): the same slot filled either way
ADJECTIVES = [("wonderful", "dull"), ("brilliant", "awful"), ("gripping", "boring"), ("moving", "tedious"),
              ("charming", "clumsy"), ("superb", "flat"), ("delightful", "weak"), ("beautiful", "predictable"),
              ("funny", "messy"), ("clever", "bland"), ("fresh", "terrible"), ("stunning", "lifeless"),
              ("powerful", "silly"), ("excellent", "poor"), ("great", "bad"), ("lovely", "lazy")]
PHRASES = [("i loved every minute", "i hated every minute"),
           ("i would gladly watch it again", "i would never watch it again"),
           ("it is a real masterpiece", "it is a complete waste of time"),
           ("highly recommended", "avoid it at all costs"),
           ("i enjoyed it a lot", "i regret watching it"),
           ("my friends loved it too", "my friends were bored too")]
OPENERS = ["", "", "", "honestly ,", "overall ,", "to be fair ,", "in my opinion ,", "i think", "for me ,"]
JOINS = ["and", ",", "and also", ", and", "; also"]
POSITIVE_WORDS = {p for p, _ in ADJECTIVES} | {"loved", "gladly", "masterpiece", "recommended", "enjoyed"}
NEGATIVE_WORDS = {n for _, n in ADJECTIVES} | {"hated", "never", "waste", "avoid", "regret", "bored"}


def plan(rng: random.Random) -> dict:
    """A review without its polarity: opener, clauses (aspect, verb, adjective slot, or a phrase slot), joins."""
    clauses = []
    for _ in range(rng.choice([1, 2, 2, 3])):
        if rng.random() < 0.75:
            clauses.append([rng.choice(ASPECTS), rng.choice(VERBS), rng.randrange(len(ADJECTIVES))])
        else:
            clauses.append([rng.randrange(len(PHRASES))])
    return {"opener": rng.choice(OPENERS), "clauses": clauses, "joins": [rng.choice(JOINS) for _ in clauses[1:]]}


def render(review: dict, positive: bool) -> str:
    side = 0 if positive else 1
    words = [review["opener"]] if review["opener"] else []
    for i, clause in enumerate(review["clauses"]):
        if i:
            words.append(review["joins"][i - 1])
        if len(clause) == 3:
            words += [clause[0], clause[1], ADJECTIVES[clause[2]][side]]
        else:
            words.append(PHRASES[clause[0]][side])
    return " ".join(words + ["."])


def opinion(text: str) -> int:
    """Positive opinion words minus negative ones."""
    words = text.split()
    return sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)


def is_positive(text: str) -> bool:
    """The quickstart's judge: more positive opinion words than negative ones."""
    return opinion(text) > 0


def reviews(n: int, seed: int, positive_share: float = 0.1) -> list[dict]:
    """n reviews, each positive with probability `positive_share`, as {'text', 'label'} (1 = positive).

    Mostly critical by default, so that the SFT model is a grumpy reviewer whose rewards
    vary little, and a policy that turns positive stands out by several standard deviations.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        review, positive = plan(rng), rng.random() < positive_share
        out.append({"text": render(review, positive), "label": int(positive)})
    return out


def pairs(n: int, seed: int, cut_share: float = 0.5, neutral_share: float = 0.3) -> list[dict]:
    """n preference pairs: one plan rendered positive (chosen) over negative (rejected).

    A share `cut_share` is cut after the same number of words, past the first opinion word,
    so that the reward model also scores unfinished text, as PPO's samples are. In a share
    `neutral_share` the review's opening alone, before any opinion word, takes the place of
    the rejected text or (half the time) of the chosen one: praise beats saying nothing, which
    beats criticism. Without these, text that says nothing scores like praise, and PPO learns
    to say nothing.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        review = plan(rng)
        chosen, rejected = render(review, True).split(), render(review, False).split()
        first = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b)  # where they part
        if rng.random() < cut_share:  # somewhere after both have given an opinion
            k = rng.randint(max(_first_opinion(chosen), _first_opinion(rejected)) + 1, min(len(chosen), len(rejected)))
            chosen, rejected = chosen[:k], rejected[:k]
        if rng.random() < neutral_share and first > 0:  # an opening ranks between praise and criticism
            opening = chosen[:first] + ["."] * rng.randint(0, 1)
            chosen, rejected = (chosen, opening) if rng.random() < 0.5 else (opening, rejected)
        out.append({"chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return out


def _first_opinion(words: list[str]) -> int:
    return next(i for i, w in enumerate(words) if w in POSITIVE_WORDS or w in NEGATIVE_WORDS)


def openings(n: int, seed: int) -> list[dict]:
    """n distinct prompts: the words of a review before its first opinion word, so the policy
    picks the sentiment. Distinct, so that prompts held out for evaluation are never trained on.
    (The grammar has about 1,400; n must stay well below that.)"""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    while len(seen) < n:
        words = render(plan(rng), True).split()
        first = _first_opinion(words)
        if first > 0:
            seen[" ".join(words[:first])] = None
    return [{"text": text} for text in seen]


def train_tokenizer(texts: list[str], directory: Path, max_length: int = 64, seq2seq: bool = False):
    """A word-level tokenizer over `texts` with <pad>, <unk> and <eos>, saved for AutoTokenizer;
    seq2seq: with T5's specials instead (<pad> = 0, </s> = 1, <unk>), appending </s> to every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["<pad>", "</s>", "<unk>"] if seq2seq else ["<pad>", "<unk>", "<eos>"]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials, show_progress=False))
    if seq2seq:
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                                 special_tokens=[("</s>", 1)])
    eos = "</s>" if seq2seq else "<eos>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   eos_token=eos, bos_token=None if seq2seq else eos, model_max_length=max_length,
                                   model_input_names=["input_ids", "attention_mask"])  # GPT-2 would add token types
    fast.save_pretrained(directory)
    return fast


def write(directory: Path, seed: int = 0, num_reviews: int = 4000, num_pairs: int = 3000,
          num_prompts: int = 1000) -> None:
    """Everything the quickstart recipes read: reviews.jsonl, pairs.jsonl, preferences.jsonl,
    prompts.jsonl, base/, continuations.jsonl and base_seq2seq/."""
    from transformers import GPT2Config, T5Config

    directory.mkdir(parents=True, exist_ok=True)
    rows = reviews(num_reviews, seed)
    _write_jsonl(directory / "reviews.jsonl", rows)
    pair_rows = pairs(num_pairs, seed + 1)
    _write_jsonl(directory / "pairs.jsonl", pair_rows)
    _write_jsonl(directory / "preferences.jsonl", preferences(pair_rows))
    _write_jsonl(directory / "prompts.jsonl", openings(num_prompts, seed + 2))
    tokenizer = train_tokenizer([r["text"] for r in rows], directory / "base")
    # about 0.4M parameters: a 2-core CPU trains it in under a minute; 64 positions fit every
    # review. Width 64 wrote fluent-looking but garbled text that PPO could not steer.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=128, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    config.save_pretrained(directory / "base")
    _write_jsonl(directory / "continuations.jsonl", continuations(rows))
    t5_tokenizer = train_tokenizer([r["text"] for r in rows], directory / "base_seq2seq", seq2seq=True)
    # about 0.9M parameters, FLAN-T5's kind (gated-gelu, untied head, decoder start = pad = 0, eos = 1)
    T5Config(vocab_size=len(t5_tokenizer), d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2,
             num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
             tie_word_embeddings=False).save_pretrained(directory / "base_seq2seq")


def preferences(pair_rows: list[dict]) -> list[dict]:
    """Each pair split at its first differing word: {'prompt', 'chosen', 'rejected'}, the
    answers without a leading space (the DPO quickstart joins them with one). Pairs that
    differ from their first word, or where one text is the other's opening, have no
    prompt or no answer and are left out."""
    out = []
    for row in pair_rows:
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        first = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        if 0 < first < min(len(chosen), len(rejected)):
            out.append({"prompt": " ".join(chosen[:first]), "chosen": " ".join(chosen[first:]),
                        "rejected": " ".join(rejected[first:])})
    return out


def continuations(rows: list[dict]) -> list[dict]:
    """Each review with an opening before its first opinion word, split there: {'opening', 'rest'}."""
    out = []
    for row in rows:
        words = row["text"].split()
        first = _first_opinion(words)
        if first > 0:
            out.append({"opening": " ".join(words[:first]), "rest": " ".join(words[first:])})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else QUICKSTART)
