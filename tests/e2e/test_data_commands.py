"""Pre-training from each data source as a user runs it: a streamed parquet dataset, a messy
image folder, webdataset shards; and the eval command refusing an empty held-out split."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from data_files import image_bytes, labelled_folder, make_shards, messy_folder, pretrain, write


def test_pretrain_on_streamed_parquet(hf_folder, word_tokenizer_folder, tmp_path):
    """The acceptance run on a Hugging Face dataset, offline: parquet files, streaming, and a
    local AutoTokenizer folder for the captions."""
    done = pretrain(tmp_path / "run", "data=hf", f"data.name='{hf_folder}/*.parquet'",
                    f"text.tokenizer={word_tokenizer_folder}", "text.context_length=8",
                    "data.streaming=true", "data.text_column=caption",
                    "data.label_column=label", "data.val_fraction=0.3",
                    "data.shuffle_buffer=8", "trainer.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kNN top-1" in done.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_pretrain_on_a_messy_folder(tmp_path):
    """The acceptance run: [mim_feat, clip, cls] through the CLI on 16 training files (two of
    them broken, so one epoch is two steps and meets both) and a validation folder for kNN."""
    messy_folder(tmp_path / "images" / "train")
    (tmp_path / "images" / "train" / "cat" / "0.png").unlink()
    for i, name in enumerate(["cat", "dog", "cat", "dog"]):
        write(tmp_path / "images" / "validation" / name / f"{i}.png", image_bytes(50 + i))
    done = pretrain(tmp_path / "run", "data=imagefolder", f"data.path={tmp_path / 'images'}",
                    "trainer.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "run" / "pretrain.log").read_text()
    assert re.search(r"skipped \d+ samples: \d+ unreadable image \(e.g. .*(corrupt|truncated)",
                     log), log
    assert "ignored 1 file(s)" in log and "notes.txt" in log
    assert "kNN top-1" in done.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_pretrain_on_shards(tmp_path):
    """The acceptance run on shards with captions (some missing) and labels."""
    labelled_folder(tmp_path / "src", 24, classes=3)
    rows = (tmp_path / "src" / "metadata.jsonl").read_text().splitlines()
    (tmp_path / "src" / "metadata.jsonl").write_text("\n".join(rows[::2]) + "\n")
    make_shards(tmp_path / "src", tmp_path / "shards", 8)
    done = pretrain(tmp_path / "run", "data=webdataset",
                    f"\"data.urls='{tmp_path}/shards/{{000000..000002}}.tar'\"",
                    "data.val_fraction=0.3", "data.shuffle_buffer=8", "trainer.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"kNN top-1 .*\|\s+[\d.]+% \|", done.stdout), done.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_empty_held_out_split_warns_once_and_eval_refuses_in_one_line(tmp_path):
    """The Tour's shard command with no held-out sample: training finishes, the end-of-run
    evaluation is skipped with one warning naming the options that supply the held-out split,
    and the run exits 0; the eval command on the same data fails with one error line."""
    labelled_folder(tmp_path / "src", 16, classes=2)
    make_shards(tmp_path / "src", tmp_path / "shards", 4)
    data = ["data=webdataset", f"\"data.urls='{tmp_path}/shards/{{000000..000003}}.tar'\"",
            "data.val_fraction=0"]
    done = pretrain(tmp_path / "run", *data, "'objective=[clip,mim_feat]'", "trainer.max_steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    output = done.stdout + done.stderr
    warnings = [line for line in output.splitlines() if "evaluation skipped" in line]
    assert len(warnings) == 1, output[-3000:]
    assert "data.val_urls" in warnings[0] and "data.val_fraction (now 0:" in warnings[0]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / "eval.json").exists()

    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    command = " ".join([sys.executable, "-m", "m3i_lightning.eval", f"checkpoint={checkpoint}",
                        *data, "data.num_workers=0", f"hydra.run.dir={tmp_path / 'eval'}"])
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: the val split has no labelled")
    assert "data.val_urls" in errors[0]
    assert not (tmp_path / "eval" / "eval.json").exists()
