"""Silent corruption is caught: byte flips, truncation and deletion in every kind of checkpoint
file fail the load with one line naming the checkpoint and the file; ``checkpoint.on_corrupt=
previous`` resumes from the newest good checkpoint and rejoins the exact trajectory."""

from __future__ import annotations

import json
import shutil

import pytest
from fault_helpers import record_figure, run_cli, sft_args, trajectory

from megatron_longact.checkpoint.integrity import (
    MANIFEST_FILE,
    file_checksum,
    verify_checkpoint,
    write_manifest,
)

# One of each kind a save writes: tensor shards, torch DCP metadata, megatron common state and
# format metadata, per-rank RNG, the run's config, and the manifest itself.
FILE_KINDS = ("__0_0.distcp", ".metadata", "common.pt", "metadata.json", "rng/rank00000.pt",
              "config.yaml", MANIFEST_FILE)  # fmt: skip


def _flip(path, *, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_checksum_streams_in_chunks_and_matches_zlib(tmp_path, monkeypatch):
    import zlib

    from megatron_longact.checkpoint import integrity

    monkeypatch.setattr(integrity, "CHUNK_BYTES", 1000)  # many chunks for a 10 kB file
    path = tmp_path / "blob"
    payload = bytes(range(256)) * 40
    path.write_bytes(payload)
    assert file_checksum(path) == {"size": len(payload), "crc32": zlib.crc32(payload)}


def test_every_flip_truncation_and_deletion_is_found_in_a_synthetic_checkpoint(tmp_path):
    ckpt = tmp_path / "iter_0000002"
    (ckpt / "rng").mkdir(parents=True)
    for name in ("__0_0.distcp", "common.pt", "metadata.json", "rng/rank00000.pt"):
        (ckpt / name).write_bytes(bytes(range(256)) * 8)
    write_manifest(ckpt)
    assert verify_checkpoint(ckpt) is None
    pristine = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}

    def restore():
        for path, data in pristine.items():
            path.write_bytes(data)

    for name in ("__0_0.distcp", "common.pt", "rng/rank00000.pt"):
        _flip(ckpt / name, count=1)  # a single byte
        assert name in verify_checkpoint(ckpt) and "checksum" in verify_checkpoint(ckpt)
        restore()
        (ckpt / name).write_bytes(pristine[ckpt / name][:-7])
        assert "truncated" in verify_checkpoint(ckpt)
        restore()
        (ckpt / name).unlink()
        assert verify_checkpoint(ckpt) == f"{name} is missing"
        restore()
    (ckpt / MANIFEST_FILE).write_text("{not json")
    assert "unreadable" in verify_checkpoint(ckpt)


@pytest.mark.slow
def test_byte_flips_in_each_file_kind_are_detected(baseline, tmp_path):
    source = baseline.ckpt / "iter_0000006"
    assert {str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()} >= set(FILE_KINDS)
    detected = 0
    for kind in FILE_KINDS:
        ckpt = tmp_path / kind.replace("/", "_") / "iter_0000006"
        shutil.copytree(source, ckpt)
        _flip(ckpt / kind)
        problem = verify_checkpoint(ckpt)
        assert problem is not None, kind
        detected += 1
    record_figure("byte_flips", injected=len(FILE_KINDS), detected=detected)
    assert detected == len(FILE_KINDS)


def _resume_dir(baseline, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(baseline.ckpt, run_dir / "ckpt")
    for late in ("iter_0000006",):  # the run was "killed" after step 4's save
        shutil.rmtree(run_dir / "ckpt" / late)
    (run_dir / "ckpt" / "latest").write_text("iter_0000004\n")
    return run_dir


@pytest.mark.slow
def test_corrupt_shard_fails_in_one_line_and_previous_rejoins_the_trajectory(baseline, tmp_path):
    run_dir = _resume_dir(baseline, tmp_path)
    _flip(run_dir / "ckpt" / "iter_0000004" / "__0_0.distcp", count=4000)
    args = sft_args(baseline.data_dir, run_dir)
    failed = run_cli(args)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert failed.error_lines() == [failed.stderr.strip().splitlines()[-1]]
    (line,) = failed.error_lines()
    assert "iter_0000004 is corrupt: __0_0.distcp fails its checksum" in line
    assert "Traceback" not in failed.stderr
    assert not (run_dir / "tb" / "metrics.jsonl").exists()  # failed before step 1

    resumed = run_cli([*args, "checkpoint.on_corrupt=previous"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trying an older one" in resumed.stderr
    again = trajectory(run_dir)
    assert sorted(again) == [3, 4, 5, 6]  # from iter_0000002
    assert {s: again[s] for s in again} == {s: baseline.trajectory[s] for s in again}


@pytest.mark.slow
def test_truncated_shard_and_missing_common_pt_name_the_file(baseline, tmp_path):
    run_dir = _resume_dir(baseline, tmp_path)
    shard = run_dir / "ckpt" / "iter_0000004" / "__0_1.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    failed = run_cli(sft_args(baseline.data_dir, run_dir))
    (line,) = failed.error_lines()
    assert failed.returncode == 2 and "__0_1.distcp has" in line and "truncated" in line

    # An older save without checksums: megatron's own failure becomes one line too.
    shutil.copy2(baseline.ckpt / "iter_0000004" / "__0_1.distcp", shard)
    (run_dir / "ckpt" / "iter_0000004" / MANIFEST_FILE).unlink()
    (run_dir / "ckpt" / "iter_0000004" / "common.pt").unlink()
    failed = run_cli(sft_args(baseline.data_dir, run_dir))
    (line,) = failed.error_lines()
    assert failed.returncode == 2 and "cannot read common.pt" in line, failed.stderr[-3000:]


@pytest.mark.slow
def test_checkpoint_of_another_model_size_is_one_line(baseline, tmp_path):
    failed = run_cli(["sft", "model.preset=tiny-qwen3", "optim.warmup_steps=0",
                      f"data.train_path={baseline.data_dir / 'sft_train.jsonl'}",
                      "data.seq_length=256", "data.global_batch_size=2", "train.train_steps=2",
                      f"checkpoint.load_dir={baseline.ckpt}", "logging.progress=false"])  # fmt: skip
    (line,) = failed.error_lines()
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "holds a model of another size" in line and "Global shape mismatch" not in line
    assert "Traceback" not in failed.stderr


def test_manifest_lists_every_file_with_its_size(tmp_path):
    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir()
    (ckpt / "a.bin").write_bytes(b"x" * 123)
    write_manifest(ckpt)
    files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    assert files == {"a.bin": {"size": 123, "crc32": file_checksum(ckpt / "a.bin")["crc32"]}}


@pytest.mark.slow
def test_export_of_a_corrupt_checkpoint_is_refused(baseline, tmp_path, capsys):
    from megatron_longact.cli import main as longact_main

    ckpt = tmp_path / "ckpt" / "iter_0000006"
    shutil.copytree(baseline.ckpt / "iter_0000006", ckpt)
    _flip(ckpt / "__0_1.distcp")
    out = tmp_path / "hf"
    argv = ["convert", "--direction", "mcore2hf", "--load", str(ckpt), "--out", str(out)]
    assert longact_main(argv) == 2
    assert "__0_1.distcp fails its checksum" in capsys.readouterr().err
    assert not out.exists()
