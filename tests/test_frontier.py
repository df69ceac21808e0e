"""The reward-KL frontier: best-of-N maths, and a sweep of a PPO and a DPO recipe on the tiny
models through the CLI, with points reused on a second run and a failing point recorded."""
import itertools
import json
import math

import numpy as np
import pytest

from conftest import SMALL, local_overrides
from rlhf_recipes.frontier import main, references_agree
from rlhf_recipes.reporting.metrics import best_of_n_kl, expected_best_of
from test_dpo import recipe_file


def test_best_of_n_is_the_mean_over_every_n_subset_of_the_best_samples_value():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(3, 6)), rng.integers(0, 2, size=(3, 6)).astype(float)
    for n in range(1, 7):
        brute = [np.mean([values[p, max(c, key=lambda i: rewards[p, i])] for c in itertools.combinations(range(6), n)])
                 for p in range(3)]
        assert expected_best_of(rewards, n, values) == pytest.approx(brute)
    assert expected_best_of(rewards, 1) == pytest.approx(rewards.mean(1))
    assert expected_best_of(rewards, 6) == pytest.approx(rewards.max(1))
    assert best_of_n_kl(1) == 0 and best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    with pytest.raises(ValueError, match="needs 1 <= n <= 6"):
        expected_best_of(rewards, 7)


def test_points_compare_only_when_their_references_scored_every_prompt_alike():
    reference = [0.5, -1.25, 2.0]
    assert references_agree([reference, [x + 1e-7 for x in reference], reference])  # float noise
    assert not references_agree([reference, [0.5, -1.25, 2.1]])  # another reward, reference or prompt
    assert not references_agree([reference, reference[:2]])  # other held-out prompts
    assert references_agree([]) and references_agree([reference])


@pytest.mark.slow
def test_a_sweep_trains_each_point_once_compares_them_and_records_a_failure(tiny_dir, prefs, tmp_path, capsys):
    dpo = recipe_file(tmp_path, tiny_dir, prefs)
    same = ["prompts.query_min_tokens=2", "prompts.query_max_tokens=4", "eval.num_prompts=16", "eval.batch_size=16",
            "generation.response_min_tokens=4", "generation.response_max_tokens=6", "eval.every=2"]
    ppo = ["imdb_positive", "ppo.target=1,8", *local_overrides("imdb_positive", tiny_dir),
           *[o for o in SMALL if not o.startswith(("eval.", "generation."))], "run.steps=4",
           "ppo.learning_rate=1e-3"]
    sweeps = [str(tmp_path / "sweep"), "--sweep", *ppo, "--sweep", dpo, "dpo.beta=0.1,0.5"]
    failing = ["--sweep", dpo, "dpo.learning_rate=1e-2", "dpo.heldout=100000"]
    rest = ["--set", *same, "--best-of", "1,2,4"]
    assert main(sweeps + failing + rest) == 1  # the last point cannot hold out that many rows
    err = capsys.readouterr().err
    assert "dpo.heldout=100000 are held out" in err and err.count("error:") == 1
    frontier = json.loads((tmp_path / "sweep" / "frontier.json").read_text())
    statuses = [p["status"] for p in frontier["points"]]
    assert statuses[:4] == ["trained"] * 4 and statuses[4].startswith("failed")
    assert frontier["comparable"]  # the same reference, prompts and reward: the reference scores agree
    done = frontier["points"][:4]
    assert [p["method"] for p in done] == ["ppo", "ppo", "dpo", "dpo"]
    assert all(p["after"]["kl"]["mean"] != 0 and len(p["during"]) == 1 for p in done)  # eval.every=2 of 4 steps
    bon = frontier["best_of_n"]
    assert [b["n"] for b in bon] == [1, 2, 4] and bon[0]["kl"] == 0
    assert bon[0]["reward"]["mean"] <= bon[1]["reward"]["mean"] <= bon[2]["reward"]["mean"]
    assert (tmp_path / "sweep" / "frontier.png").stat().st_size > 0
    stages = tmp_path / "sweep" / "imdb_positive" / "ppo.target=1" / "stages"
    assert stages.is_symlink() and stages.resolve() == (tmp_path / "sweep" / "stages").resolve()

    assert main(sweeps + rest) == 0  # without the failing sweep
    again = json.loads((tmp_path / "sweep" / "frontier.json").read_text())
    assert [p["status"] for p in again["points"]] == ["reused"] * 4
    assert [p["after"] for p in again["points"]] == [p["after"] for p in done]


@pytest.mark.slow
def test_a_stopped_sweep_resumes_where_it_stopped(tiny_dir, prefs, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from rlhf_recipes.runtime.rundir import read_metrics

    dpo = recipe_file(tmp_path, tiny_dir, prefs, slow=True)  # sleeps before each update
    argv = [str(tmp_path / "sweep"), "--sweep", dpo, "dpo.beta=0.1,0.5", "--best-of", ""]
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_recipes.frontier", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    first = tmp_path / "sweep" / "tiny_dpo" / "dpo.beta=0.1"
    deadline = time.monotonic() + 240
    while len(read_metrics(first)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "run the same command again to resume the sweep" in err
    stopped = json.loads((tmp_path / "sweep" / "frontier.json").read_text())
    assert [p["status"] for p in stopped["points"]] == ["not run", "not run"]
    assert main(argv) == 0
    resumed = json.loads((tmp_path / "sweep" / "frontier.json").read_text())
    assert [p["status"] for p in resumed["points"]] == ["resumed", "trained"] and resumed["best_of_n"] == []
    assert [r["step"] for r in read_metrics(first)] == [1, 2, 3, 4]
