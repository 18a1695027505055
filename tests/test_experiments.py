"""Smoke tests of `python -m fused_pos_attn extrapolate | claims | passkey | latency` at tiny sizes: they run,
losses are finite, tables have the right columns, files are written. Plus the passkey task's layout."""
import csv
import math

import pytest
import torch

from fused_pos_attn.__main__ import main
from fused_pos_attn.experiments.common import TrainSettings
from fused_pos_attn.experiments.passkey import KEY, QUERY, PasskeyTask

TINY_MODEL = ["--d-model", "16", "--layers", "1", "--heads", "2"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A small folder corpus, so that runs do not read the whole standard library."""
    root = tmp_path_factory.mktemp("corpus")
    gen = torch.Generator().manual_seed(0)
    for i in range(30):
        words = torch.randint(97, 123, (3000,), generator=gen).tolist()
        (root / f"f{i}.txt").write_bytes(bytes(words))
    return root


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_extrapolate_smoke(tmp_path, corpus_dir, capsys):
    code = main(["extrapolate", "--train-len", "8", "--steps", "3", "--batch-size", "2", *TINY_MODEL,
                 "--multiples", "1", "2", "4", "--eval-tokens", "64", "--data", str(corpus_dir),
                 "--out-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    header = "| scheme | trained as | params | train loss (last 20) | train tokens/s | ppl @8 | ppl @16 | ppl @32 |"
    assert header in out
    rows = read_csv(tmp_path / "extrapolation_cpu.csv")
    assert [r["scheme"] for r in rows] == ["nope", "sinusoidal", "learned", "rope", "rope_linear", "rope_yarn",
                                           "alibi", "t5"]
    for row in rows:
        assert math.isfinite(float(row["train loss (last 20)"]))
        assert all(math.isfinite(float(row[f"ppl @{n}"])) and float(row[f"ppl @{n}"]) > 1 for n in (8, 16, 32))
    assert {r["trained as"] for r in rows if r["scheme"].startswith("rope")} == {"rope"}
    assert (tmp_path / "extrapolation_cpu.png").stat().st_size > 0
    md = (tmp_path / "extrapolation_cpu.md").read_text()
    assert "- device:" in md and "- torch:" in md and "- command: `python -m fused_pos_attn extrapolate" in md


def test_extrapolate_sliding_smoke(tmp_path, corpus_dir):
    code = main(["extrapolate", "--schemes", "alibi", "rope_linear", "--train-len", "8", "--steps", "2",
                 "--batch-size", "2", *TINY_MODEL, "--multiples", "1", "2", "--eval-tokens", "32", "--sliding",
                 "--stride", "4", "--data", str(corpus_dir), "--out-dir", str(tmp_path), "--no-plot"])
    assert code == 0
    rows = read_csv(tmp_path / "extrapolation_cpu_sliding.csv")
    assert [r["scheme"] for r in rows] == ["alibi", "rope_linear"]
    assert all(math.isfinite(float(r["ppl @16"])) for r in rows)
    assert "sliding windows" in (tmp_path / "extrapolation_cpu_sliding.md").read_text()


def test_claims_smoke(tmp_path, corpus_dir, capsys):
    code = main(["claims", "--train-len", "8", "--steps", "3", "--batch-size", "4", "--kernel-steps", "3",
                 "--kernel-multiples", "1", *TINY_MODEL, "--eval-tokens", "64", "--data", str(corpus_dir),
                 "--out-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| run | train len | batch | steps | tokens | train tokens/s |" in out
    assert "| model | attention | train len | batch | train tokens/s |" in out
    assert "26.2 / 29.3 GB" in out and "ratio alibi / sinusoidal" in out
    rows = read_csv(tmp_path / "claims_cpu.csv")
    assert [(r["name"], r["attention"]) for r in rows] == [
        ("alibi@L", "fused"), ("sinusoidal@2L", "fused"), ("alibi@L", "fused"), ("alibi@L", "sdpa"),
        ("sinusoidal@2L", "fused"), ("sinusoidal@2L", "sdpa")]
    main_runs = rows[:2]
    assert [int(r["train_len"]) for r in main_runs] == [8, 16] and [int(r["batch_size"]) for r in main_runs] == [4, 2]
    assert main_runs[0]["tokens"] == main_runs[1]["tokens"]  # same training tokens
    for row in rows:
        assert math.isfinite(float(row["final_loss"])) and float(row["tokens_per_s"]) > 0
        assert float(row["peak_total_mib"]) > 10  # a real RSS reading from the fresh process
    assert all(math.isfinite(float(r["perplexity"])) for r in main_runs)


def test_passkey_smoke(tmp_path, capsys):
    code = main(["passkey", "--schemes", "alibi", "rope", "rope_yarn", "t5", "--train-len", "12", "--steps", "3",
                 "--batch-size", "4", *TINY_MODEL, "--multiples", "1", "2", "--depths", "0", "0.5", "1",
                 "--trials", "3", "--out-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| scheme | train loss (last 20) | acc @12 | acc @24 |" in out
    assert "| scheme | length | depth 0 | depth 0.5 | depth 1 |" in out
    rows = read_csv(tmp_path / "passkey_cpu.csv")
    assert len(rows) == 4 * 2 * 3 and all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert (tmp_path / "passkey_cpu.png").stat().st_size > 0


def test_latency_smoke(tmp_path, capsys):
    code = main(["latency", "--schemes", "alibi", "rope", "t5", "nope", "--contexts", "32", "64", *TINY_MODEL,
                 "--steps", "2", "--warmup", "1", "--out-dir", str(tmp_path)])
    assert code == 0
    assert "| scheme | context | fused ms/token | sdpa ms/token | sdpa / fused |" in capsys.readouterr().out
    rows = read_csv(tmp_path / "decode_latency_cpu.csv")
    assert len(rows) == 4 * 2 * 2 and all(float(r["median_ms"]) > 0 for r in rows)
    assert (tmp_path / "decode_latency_cpu.png").stat().st_size > 0


def test_passkey_task_layout():
    task = PasskeyTask(key_len=3)
    gen = torch.Generator().manual_seed(0)
    for depth, key_at in ((0.0, 0), (1.0, 20 - 3 - 4)):
        inputs, targets, mask = task.batch(5, 20, gen, depth)
        assert inputs.shape == targets.shape == mask.shape == (5, 20)
        assert (inputs[:, key_at] == KEY).all() and (inputs[:, 20 - 3] == QUERY).all()
        digits = inputs[:, key_at + 1:key_at + 4]
        assert torch.equal(targets[mask].view(5, 3), digits)  # the answer is the planted key
        assert mask.sum() == 15 and mask[:, -3:].all()
        for slot in range(3):  # slot s uses its own ten tokens
            assert ((digits[:, slot] >= 200 + 10 * slot) & (digits[:, slot] < 210 + 10 * slot)).all()
        filler = torch.ones(20, dtype=torch.bool)
        filler[key_at:key_at + 4] = False
        filler[17:] = False
        assert (inputs[:, filler] < 200).all()
    with pytest.raises(ValueError, match="too short"):
        task.batch(1, 6, gen)


def test_check_subcommand_still_parses():
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--help"])
    assert exit_info.value.code == 0


def test_learning_rate_schedule():
    settings = TrainSettings(steps=100, batch_size=1, seq_len=1, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert settings.lr_at(0) == pytest.approx(0.1) and settings.lr_at(9) == pytest.approx(1.0)
    assert settings.lr_at(10) == pytest.approx(1.0) and settings.lr_at(100) == pytest.approx(0.1)
