"""Small local models and prompt files, built from nothing, for runs without the Hub.

`python -m rlhf_recipes.tiny DIR` writes random-weight models with the real
architectures, tokenizers (trained here with `tokenizers`) and label names of the
shipped recipes' Hub models, plus prompt files shaped like their datasets:

    DIR/gpt2              GPT-2 causal LM; like the real one, its tokenizer has no pad token
    DIR/gpt-neo           GPT-Neo causal LM (detoxify's policy architecture)
    DIR/gpt-neox          GPT-NeoX causal LM (the 8-bit recipe's architecture)
    DIR/llama             Llama causal LM (grouped-query attention) with a SentencePiece-style
                          (Metaspace) tokenizer that adds BOS, as Llama, Mistral and Gemma do
    DIR/qwen2-instruct    Qwen2 instruct causal LM: a ChatML chat template, tokenizer EOS <|endoftext|> (also
                          the pad) and a generation config that ends at <|im_end|> or <|endoftext|>,
                          as Qwen2.5-Instruct's two end tokens
    DIR/bart              BART encoder-decoder (decoder start = </s>, a forced <s> first, as BART's)
    DIR/t5                T5 encoder-decoder (gated-gelu, decoder start = pad = 0, eos = 1) with a
                          tokenizer that appends </s>, as T5's does (the FLAN-T5 recipe's architecture)
    DIR/distilbert-imdb   DistilBERT classifier, labels NEGATIVE / POSITIVE
    DIR/roberta-hate      RoBERTa classifier, labels nothate / hate
    DIR/imdb.jsonl        review-like texts: {"text", "label"}
    DIR/toxicity.jsonl    rows like real-toxicity-prompts: {"prompt": {"text", "toxicity"}}
    DIR/dialogsum.jsonl   rows like knkarthick/dialogsum: {"id", "dialogue", "summary", "topic"}

The weights are random, so rewards are noise: these prove the plumbing, not learning.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (BartConfig, BartForConditionalGeneration, BartTokenizerFast, DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast,
                          GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, GPTNeoConfig, GPTNeoForCausalLM,
                          GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXTokenizerFast, LlamaConfig, LlamaForCausalLM,
                          LlamaTokenizerFast, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                          RobertaConfig, RobertaForSequenceClassification, RobertaTokenizerFast, T5Config,
                          T5ForConditionalGeneration, T5TokenizerFast)

from .components.compat import no_progress_bars

_GOOD = ["wonderful", "moving", "brilliant", "charming", "gripping", "funny", "beautiful", "superb"]
_BAD = ["dull", "clumsy", "boring", "tedious", "messy", "flat", "predictable", "weak"]
_THINGS = ["the acting", "the plot", "the script", "the music", "the ending", "the cast", "the director",
           "the story", "the pacing", "the dialogue"]
_OPENERS = ["I watched this film last night and", "This movie", "Honestly, this picture", "My friends said",
            "The trailer promised a lot, but", "From the first scene", "I expected little, yet"]


def review_corpus(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """`n` short movie-review-like texts with a 0/1 sentiment label, from a small grammar."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = _GOOD if label else _BAD
        parts = [rng.choice(_OPENERS)]
        for _ in range(rng.randint(2, 4)):
            parts.append(f"{rng.choice(_THINGS)} was {rng.choice(words)}")
        out.append((", ".join(parts) + ".", label))
    return out


def _bpe(texts: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def gpt2_tokenizer(texts: list[str], vocab_size: int = 512, cls=GPT2TokenizerFast) -> PreTrainedTokenizerFast:
    """Byte-level BPE with GPT-2's single special token and, like GPT-2, no pad token."""
    eot = "<|endoftext|>"
    return cls(tokenizer_object=_bpe(texts, vocab_size, [eot]), bos_token=eot, eos_token=eot, unk_token=eot)


def llama_tokenizer(texts: list[str], vocab_size: int = 512) -> LlamaTokenizerFast:
    """SentencePiece-style BPE: words carry a leading "▁" instead of a space, and BOS <s> is added."""
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              add_bos_token=True, add_eos_token=False, legacy=False)


CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
          "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""Qwen2.5-Instruct's template (ChatML, a default system message), without its tool calls."""


def qwen2_instruct(texts: list[str], vocab_size: int = 512, width: int = 32, layers: int = 2):
    """(model, tokenizer): a random Qwen2 whose tokenizer has the ChatML template and whose
    generation config names two end tokens, <|im_end|> (the end of a turn) and <|endoftext|>
    (the tokenizer's EOS), as Qwen2.5-Instruct's does."""
    from transformers import GenerationConfig

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(texts + ["You are a helpful assistant. system user assistant"],
                                                         vocab_size, specials),
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    tok.chat_template = CHATML
    ends = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, bos_token_id=None, eos_token_id=ends,
                                         tie_word_embeddings=True))
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=ends, pad_token_id=tok.pad_token_id,
                                               do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                                               repetition_penalty=1.05)  # Qwen2.5-Instruct's own defaults
    return model, tok


def bart(texts: list[str], vocab_size: int = 512, width: int = 32):
    """(model, tokenizer): a random BART that starts its decoder with </s> and is forced to write
    <s> first (forced_bos_token_id), as facebook/bart-* do."""
    from transformers import GenerationConfig

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = _bpe(texts, vocab_size, specials)
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = BartTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                            cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=width, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width, max_position_embeddings=128,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0))
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                               decoder_start_token_id=2, forced_bos_token_id=0,
                                               forced_eos_token_id=2, no_repeat_ngram_size=3, num_beams=4)
    return model, tok


def t5_tokenizer(texts: list[str], vocab_size: int = 512) -> T5TokenizerFast:
    """SentencePiece Unigram, as T5's is, with T5's specials, <pad> = 0 and </s> = 1, appending </s>.

    Unigram because transformers 5 rebuilds a saved T5 tokenizer as one. Its pieces come from BPE
    training (Unigram's trainer starves on a corpus this small), all scored alike: the fewest pieces win."""
    specials = ["<pad>", "</s>", "<unk>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       show_progress=False))
    pieces = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    tok = Tokenizer(models.Unigram([(p, 0.0 if i < 3 else -1.0) for p, i in pieces], unk_id=2))
    tok.pre_tokenizer = bpe.pre_tokenizer
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def t5(tokenizer, width: int = 32, layers: int = 2) -> T5ForConditionalGeneration:
    """A random-weight T5 of FLAN-T5's kind: gated-gelu feed-forward, decoder start = pad = 0, eos = 1."""
    return T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=layers,
        num_decoder_layers=layers, num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, tie_word_embeddings=False))


def dialogues(n: int, seed: int) -> list[dict]:
    """Rows shaped like DialogSum's: a #Person1#/#Person2# dialogue of 200 to 1,000 characters and a summary."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns, thing = [], rng.choice(_THINGS)
        while len("\n".join(turns)) < 220:
            who = f"#Person{len(turns) % 2 + 1}#"
            turns.append(f"{who}: {rng.choice(_OPENERS)} {thing} was {rng.choice(_GOOD + _BAD)}.")
        out.append({"id": f"train_{i}", "dialogue": "\n".join(turns)[:1000],
                    "summary": f"#Person1# and #Person2# talk about {thing}.", "topic": thing})
    return out


def distilbert_tokenizer(texts: list[str], vocab_size: int = 512, max_length: int = 64) -> DistilBertTokenizerFast:
    """Lower-cased WordPiece with [CLS] ... [SEP], as DistilBERT uses."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                             show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return DistilBertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)


def roberta_tokenizer(texts: list[str], vocab_size: int = 512, max_length: int = 64) -> RobertaTokenizerFast:
    """Byte-level BPE with RoBERTa's <s> ... </s> specials."""
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = _bpe(texts, vocab_size, specials)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    return RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                model_max_length=max_length)


def causal_lm(arch: str, tokenizer: PreTrainedTokenizerFast, width: int = 32, layers: int = 2,
              heads: int = 2, positions: int = 128):
    """A random-weight causal LM of architecture `arch` ('gpt2', 'gpt-neo' or 'gpt-neox')."""
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=layers, n_head=heads, n_positions=positions, **ids))
    if arch == "gpt-neo":
        return GPTNeoForCausalLM(GPTNeoConfig(hidden_size=width, num_layers=layers, num_heads=heads,
                                              attention_types=[[["global", "local"], layers // 2]],
                                              window_size=positions // 2, max_position_embeddings=positions, **ids))
    if arch == "gpt-neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                                intermediate_size=4 * width, max_position_embeddings=positions, **ids))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                            num_attention_heads=2 * heads, num_key_value_heads=heads,
                                            max_position_embeddings=positions, **ids))
    raise ValueError(f"unknown causal LM architecture {arch!r}; use gpt2, gpt-neo, gpt-neox or llama")


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write every local model and prompt file listed in this module's docstring under `out_dir`."""
    with no_progress_bars():  # transformers 5.x draws one per model saved
        return _build(Path(out_dir), seed)


def _build(out: Path, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    corpus = review_corpus(600, seed)
    texts = [t for t, _ in corpus]
    with open(out / "imdb.jsonl", "w") as f:
        for text, label in corpus:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    rng = random.Random(seed + 1)
    with open(out / "toxicity.jsonl", "w") as f:
        for text, _ in corpus:
            f.write(json.dumps({"prompt": {"text": text, "toxicity": round(rng.random(), 3)},
                                "challenging": rng.random() < 0.2}) + "\n")

    for arch, cls in (("gpt2", GPT2TokenizerFast), ("gpt-neo", GPT2TokenizerFast), ("gpt-neox", GPTNeoXTokenizerFast)):
        tok = gpt2_tokenizer(texts, cls=cls)
        causal_lm(arch, tok).save_pretrained(out / arch)
        tok.save_pretrained(out / arch)
    tok = llama_tokenizer(texts)
    causal_lm("llama", tok).save_pretrained(out / "llama")
    tok.save_pretrained(out / "llama")
    for name, (model, tok) in (("qwen2-instruct", qwen2_instruct(texts)), ("bart", bart(texts))):
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    rows = dialogues(300, seed + 2)
    with open(out / "dialogsum.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tok = t5_tokenizer(texts + [r["dialogue"] for r in rows[:50]] + ["#Person1# and #Person2# talk about",
                                                                       "Summarize the following conversation. Summary:"])
    t5(tok).save_pretrained(out / "t5")
    tok.save_pretrained(out / "t5")

    for name, tok, model in (
        ("distilbert-imdb", distilbert_tokenizer(texts), lambda t: DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=len(t), dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
            pad_token_id=t.pad_token_id, id2label={0: "NEGATIVE", 1: "POSITIVE"},
            label2id={"NEGATIVE": 0, "POSITIVE": 1}))),
        ("roberta-hate", roberta_tokenizer(texts), lambda t: RobertaForSequenceClassification(RobertaConfig(
            vocab_size=len(t), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=66, pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id,
            eos_token_id=t.eos_token_id, id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1}))),
    ):
        model(tok).save_pretrained(out / name)
        tok.save_pretrained(out / name)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_recipes.tiny", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("out_dir", help="directory to write the models and prompt files into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote local models and prompts to {build(args.out_dir, args.seed)}")


if __name__ == "__main__":
    main()
