"""The model registry: versions, the champion pointer, and promotions interrupted at every stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from preftune.eval.gate import decide
from preftune.io import registry, storage

FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": os.urandom(4096),
    "tokenizer.json": b'{"version": "1.0"}',
    "lineage.json": b'{"stage": "dpo", "base_model": "tiny", "chain": []}',
    "README.md": b"# preftune dpo model\n",
    "extra/notes.txt": b"nested files keep their layout",
}
GOOD = {
    "win_rate_vs_champion": 0.7,
    "kl_candidate_reference": 2.0,
    "distinct_2_candidate": 0.5,
    "distinct_2_reference": 0.5,
}
THRESHOLDS = {
    "min_win_rate_vs_champion": 0.5,
    "max_kl": 5.0,
    "min_diversity_ratio": 0.8,
    "length_controlled": False,
}


def make_candidate(path: Path, tag: str = "a") -> str:
    for name, data in FILES.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data + tag.encode() if name == "model.safetensors" else data)
    return str(path)


@pytest.fixture(params=["local", "s3"])
def registry_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    bucket = request.getfixturevalue("s3")
    return bucket.uri("registry")


def _files_of(uri: str, tmp_path: Path, name: str) -> dict[str, bytes]:
    dest = storage.download(uri, tmp_path / name)
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in Path(dest).rglob("*") if p.is_file()}


def test_two_promotions_make_v1_then_v2_and_move_the_pointer(registry_uri: str, tmp_path: Path) -> None:
    assert registry.current_champion(registry_uri, "policy") is None
    assert registry.resolve_champion(registry_uri, "policy") == ""
    assert registry.list_versions(registry_uri, "policy") == []

    first = registry.promote(
        make_candidate(tmp_path / "a", "a"), registry_uri, "policy", GOOD, run_id="run-1"
    )
    assert first["version"] == 1 and first["previous"] is None
    assert first["uri"].rstrip("/").endswith("policy/v1")
    v1_files = _files_of(first["uri"], tmp_path, "v1-before")

    second = registry.promote(
        make_candidate(tmp_path / "b", "b"),
        registry_uri,
        "policy",
        {**GOOD, "kl_candidate_reference": 1.0},
        run_id="run-2",
    )
    assert second["version"] == 2 and second["previous"] == 1
    champion = registry.current_champion(registry_uri, "policy")
    assert champion["version"] == 2 and champion["run_id"] == "run-2"
    assert champion["metrics"]["kl_candidate_reference"] == 1.0
    assert registry.resolve_champion(registry_uri, "policy") == second["uri"]
    assert [v["version"] for v in registry.list_versions(registry_uri, "policy")] == [1, 2]
    assert registry.list_models(registry_uri) == ["policy"]
    assert _files_of(first["uri"], tmp_path, "v1-after") == v1_files  # v1 untouched

    v2 = _files_of(second["uri"], tmp_path, "v2")
    assert v2["model.safetensors"] == FILES["model.safetensors"] + b"b"
    assert v2["extra/notes.txt"] == FILES["extra/notes.txt"]
    manifest = json.loads(v2[registry.MANIFEST])
    assert manifest["version"] == 2 and manifest["run_id"] == "run-2"
    assert set(manifest["files"]) == set(v2) - {registry.MANIFEST}
    assert json.loads(v2["metrics.json"])["kl_candidate_reference"] == 1.0
    lineage = json.loads(v2["lineage.json"])
    assert lineage["stage"] == "dpo" and lineage["registry"]["run_id"] == "run-2"
    assert "## Registry" in v2["README.md"].decode()


def test_promotion_only_when_the_gate_passes(registry_uri: str, tmp_path: Path) -> None:
    candidate = make_candidate(tmp_path / "a")
    rejected = decide({**GOOD, "kl_candidate_reference": 50.0}, **THRESHOLDS)
    assert rejected["promote"] is False
    with pytest.raises(registry.RegistryError, match="gate rejected"):
        registry.promote(candidate, registry_uri, "policy", GOOD, decision=rejected)
    assert registry.current_champion(registry_uri, "policy") is None
    assert registry.list_versions(registry_uri, "policy") == []

    accepted = decide(GOOD, **THRESHOLDS)
    pointer = registry.promote(candidate, registry_uri, "policy", GOOD, decision=accepted)
    assert pointer["version"] == 1 and pointer["decision"]["promote"] is True


#: One file's transfer while a promotion stages or commits: (storage module, function).
S3_UPLOAD, LOCAL_COPY, S3_COPY = ("s3", "send"), ("transfers", "fetch"), ("s3", "copy_object")


def _staging_hook(registry_uri: str) -> tuple[str, str]:
    return S3_UPLOAD if registry_uri.startswith("s3://") else LOCAL_COPY


def _fail_after(monkeypatch: pytest.MonkeyPatch, hook: tuple[str, str], count: int) -> None:
    """Make one storage transfer into the registry raise after ``count`` calls, like a crash mid-transfer.

    Only transfers that involve the staging area count (the candidate's copy into the local bundle goes
    through the same functions and is left alone).
    """
    module = getattr(storage, hook[0])
    real = getattr(module, hook[1])
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        if ".staging" in " ".join(map(str, args)):
            if calls["n"] >= count:
                raise ConnectionError("connection reset mid-promotion")
            calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, hook[1], flaky)


def test_interrupted_upload_leaves_the_champion_and_no_visible_version(
    registry_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.promote(make_candidate(tmp_path / "a", "a"), registry_uri, "policy", GOOD)
    with monkeypatch.context() as patch:
        _fail_after(patch, _staging_hook(registry_uri), 2)
        with pytest.raises(ConnectionError):
            registry.promote(make_candidate(tmp_path / "b", "b"), registry_uri, "policy", GOOD)
    assert registry.current_champion(registry_uri, "policy")["version"] == 1
    assert [v["version"] for v in registry.list_versions(registry_uri, "policy")] == [1]

    again = registry.promote(make_candidate(tmp_path / "c", "c"), registry_uri, "policy", GOOD)
    assert again["version"] == 2
    assert registry.current_champion(registry_uri, "policy")["version"] == 2


def test_s3_copy_interrupted_before_the_manifest_leaves_no_visible_version(
    s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = s3.uri("registry")
    registry.promote(make_candidate(tmp_path / "a", "a"), uri, "policy", GOOD)
    with monkeypatch.context() as patch:
        _fail_after(patch, S3_COPY, 3)  # v2/ gets 3 files, then the copy dies
        with pytest.raises(ConnectionError):
            registry.promote(make_candidate(tmp_path / "b", "b"), uri, "policy", GOOD)
    assert s3.list_keys("registry/policy/v2/")  # a partial version is there ...
    assert [v["version"] for v in registry.list_versions(uri, "policy")] == [1]  # ... but not visible
    assert registry.current_champion(uri, "policy")["version"] == 1

    again = registry.promote(make_candidate(tmp_path / "c", "c"), uri, "policy", GOOD)
    assert again["version"] == 3  # the partial never blocks, and nothing is mixed into it
    assert [v["version"] for v in registry.list_versions(uri, "policy")] == [1, 3]
    removed = registry.remove_partials(uri, "policy")
    assert any(r.endswith("policy/v2") for r in removed)
    assert not s3.list_keys("registry/policy/v2/")
    assert [v["version"] for v in registry.list_versions(uri, "policy")] == [1, 3]


def test_verification_catches_a_corrupted_upload(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = s3.uri("registry")
    real = storage.s3.send

    def corrupting(client, path, bucket, key, info):
        real(client, path, bucket, key, info)
        if key.endswith("model.safetensors"):
            client.put_object(Bucket=bucket, Key=key, Body=b"truncated")

    monkeypatch.setattr(storage.s3, "send", corrupting)
    with pytest.raises(registry.RegistryError, match="model.safetensors"):
        registry.promote(make_candidate(tmp_path / "a"), uri, "policy", GOOD)
    assert registry.current_champion(uri, "policy") is None
    assert not s3.list_keys("registry/policy/.staging/")  # the failed staging upload was cleaned up


def test_s3_racing_promotions_cannot_both_claim_a_version(
    s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = s3.uri("registry")
    real = storage.copy_dir

    def racing(src: str, dest: str, files: dict) -> None:
        real(src, dest, files)
        storage.write_bytes(f"{dest}/{registry.MANIFEST}", b'{"files": {}}')  # the other promotion won

    monkeypatch.setattr(storage, "copy_dir", racing)
    with pytest.raises(registry.RegistryError, match="committed by another promotion"):
        registry.promote(make_candidate(tmp_path / "a"), uri, "policy", GOOD)
    assert registry.current_champion(uri, "policy") is None
    assert not s3.list_keys("registry/policy/.staging/")


_KILL_SCRIPT = """
import sys, time
from preftune.io import registry, storage
module = getattr(storage, sys.argv[4])
name = sys.argv[5]
real = getattr(module, name)
count = 0
def slow(*args, **kwargs):
    global count
    result = real(*args, **kwargs)
    if ".staging" in " ".join(map(str, args)):
        count += 1
        print(f"transferred {count}", flush=True)
        if count >= 2:
            time.sleep(60)
    return result
setattr(module, name, slow)
registry.promote(sys.argv[1], sys.argv[2], sys.argv[3], {"kl_candidate_reference": 1.0})
"""


def test_promotion_killed_with_sigkill_leaves_the_champion(registry_uri: str, tmp_path: Path) -> None:
    registry.promote(make_candidate(tmp_path / "a", "a"), registry_uri, "policy", GOOD)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILL_SCRIPT,
            make_candidate(tmp_path / "b", "b"),
            registry_uri,
            "policy",
            *_staging_hook(registry_uri),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = 60.0
        while deadline > 0 and not any("transferred 2" in line for line in seen) and proc.poll() is None:
            threading.Event().wait(0.1)
            deadline -= 0.1
        assert any("transferred 2" in line for line in seen), (
            proc.stderr.read() if proc.poll() is not None else seen
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert registry.current_champion(registry_uri, "policy")["version"] == 1
    assert [v["version"] for v in registry.list_versions(registry_uri, "policy")] == [1]

    again = registry.promote(make_candidate(tmp_path / "c", "c"), registry_uri, "policy", GOOD)
    assert again["version"] == 2
    assert [v["version"] for v in registry.list_versions(registry_uri, "policy")] == [1, 2]


def test_local_leftover_partial_version_is_skipped(tmp_path: Path) -> None:
    uri = str(tmp_path / "registry")
    registry.promote(make_candidate(tmp_path / "a", "a"), uri, "policy", GOOD)
    partial = tmp_path / "registry" / "policy" / "v2"
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # no manifest: not a version
    assert [v["version"] for v in registry.list_versions(uri, "policy")] == [1]
    assert registry.promote(make_candidate(tmp_path / "b", "b"), uri, "policy", GOOD)["version"] == 3
    assert (partial / "config.json").read_text() == "{}"  # untouched


def test_set_champion_rolls_back(tmp_path: Path) -> None:
    uri = f"file://{tmp_path / 'registry'}"
    registry.promote(make_candidate(tmp_path / "a", "a"), uri, "policy", GOOD, run_id="r1")
    registry.promote(make_candidate(tmp_path / "b", "b"), uri, "policy", GOOD, run_id="r2")
    pointer = registry.set_champion(uri, "policy", 1, reason="regression in production")
    assert pointer["version"] == 1 and pointer["previous"] == 2 and pointer["run_id"] == "r1"
    assert registry.current_champion(uri, "policy")["reason"] == "regression in production"
    with pytest.raises(registry.RegistryError, match="no complete version v7"):
        registry.set_champion(uri, "policy", 7)


@pytest.mark.parametrize("name", ["", "../escape", ".hidden", "a/b", "x" * 200])
def test_model_names_are_checked(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        registry.promote(make_candidate(tmp_path / "a"), str(tmp_path / "r"), name, GOOD)


def test_adapter_candidate_is_merged_into_full_weights(tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from preftune.eval import promotion
    from preftune.model import modeling
    from preftune.orchestration import runner

    base = str(runner.project_root() / "examples" / "tiny-llama")
    model = modeling.load_causal_lm(base)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    tokenizer = modeling.load_tokenizer(base)
    adapter_dir = tmp_path / "adapter"
    modeling.save_model(
        peft_model, tokenizer, str(adapter_dir), stage="dpo", parent_uri=base, parameters={}, data={}
    )
    assert modeling.is_adapter(str(adapter_dir))

    with pytest.raises(registry.RegistryError, match="LoRA adapter"):  # the registry alone cannot merge
        registry.promote(str(adapter_dir), str(tmp_path / "registry"), "policy", GOOD)
    assert registry.list_versions(str(tmp_path / "registry"), "policy") == []

    pointer = promotion.promote(str(adapter_dir), str(tmp_path / "registry"), "policy", GOOD)
    version = Path(pointer["uri"])
    assert not (version / "adapter_config.json").exists()
    assert (version / "model.safetensors").is_file() and (version / "tokenizer.json").is_file()
    assert json.loads((version / "lineage.json").read_text())["adapter"] is False
    merged = modeling.load_causal_lm(str(version))
    expected = modeling.load_causal_lm(str(adapter_dir))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected(ids).logits, atol=1e-5)


# ------------------------------------------------------------------------ conditional writes of the pointer


def test_a_swap_from_a_stale_read_is_refused(registry_uri: str) -> None:
    from preftune.io.registry import conditional

    uri = f"{registry_uri.rstrip('/')}/policy/{registry.CHAMPION}"
    empty = conditional.read(uri)
    assert empty == conditional.Snapshot(None, None)
    assert conditional.swap(uri, b'{"version": 1}', empty)
    assert not conditional.swap(uri, b'{"version": 9}', empty)  # someone wrote since "absent" was read
    first = conditional.read(uri)
    assert first.data == b'{"version": 1}' and first.tag
    assert conditional.swap(uri, b'{"version": 2}', first)
    assert not conditional.swap(uri, b'{"version": 9}', first)  # the tag moved on with the content
    assert conditional.read(uri).data == b'{"version": 2}'


def test_a_promotion_that_loses_the_pointer_race_goes_on_top_of_the_winner(
    registry_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another promotion moves champion.json between this one's read and its write: the write is refused,
    and this promotion tries again on top of the winner, so ``previous`` chains v1 <- v3 <- v2."""
    from preftune.io.registry import conditional

    registry.promote(make_candidate(tmp_path / "a", "a"), registry_uri, "policy", GOOD, run_id="r1")
    real_swap = conditional.swap
    refused: list[bool] = []

    def racing_swap(uri: str, data: bytes, expected: conditional.Snapshot) -> bool:
        if not refused:
            refused.append(False)  # the racing promotion below swaps for real
            rival = registry.promote(
                make_candidate(tmp_path / "b", "b"), registry_uri, "policy", GOOD, run_id="r3"
            )
            assert rival["version"] == 3 and rival["previous"] == 1
        written = real_swap(uri, data, expected)
        refused.append(not written)
        return written

    monkeypatch.setattr(conditional, "swap", racing_swap)
    mine = registry.promote(make_candidate(tmp_path / "c", "c"), registry_uri, "policy", GOOD, run_id="r2")
    assert refused[-2:] == [True, False]  # the first write lost, the retry landed
    assert mine["version"] == 2 and mine["previous"] == 3
    champion = registry.current_champion(registry_uri, "policy")
    assert champion["version"] == 2 and champion["previous"] == 3 and champion["run_id"] == "r2"
    assert [v["version"] for v in registry.list_versions(registry_uri, "policy")] == [1, 2, 3]


def test_a_decision_against_a_champion_that_moved_publishes_but_does_not_crown(
    registry_uri: str, tmp_path: Path
) -> None:
    first = registry.promote(
        make_candidate(tmp_path / "a", "a"), registry_uri, "policy", GOOD, decision=_decision("")
    )
    assert first["version"] == 1
    # this candidate's gate ran before v1 existed: it was never compared with the champion it would replace
    with pytest.raises(registry.StaleChampionError, match=r"NOT made the champion.*now v1"):
        registry.promote(
            make_candidate(tmp_path / "b", "b"), registry_uri, "policy", GOOD, decision=_decision("")
        )
    assert registry.current_champion(registry_uri, "policy")["version"] == 1
    assert [v["version"] for v in registry.list_versions(registry_uri, "policy")] == [1, 2]  # published

    compared = _decision(registry.resolve_champion(registry_uri, "policy"))
    third = registry.promote(
        make_candidate(tmp_path / "c", "c"), registry_uri, "policy", GOOD, decision=compared
    )
    assert third["version"] == 3 and third["previous"] == 1


def _decision(champion_uri: str) -> dict:
    """The gate step's decision, as the promote step receives it (``run_gate`` adds the champion it saw)."""
    return dict(
        decide(GOOD, **THRESHOLDS, has_champion=bool(champion_uri) or None), champion_uri=champion_uri
    )


def test_s3_versions_are_claimed_before_the_copy(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two promotions that pick the same number never copy into the same folder: the second one's create-only
    claim fails and it takes the next number."""
    uri = s3.uri("registry")
    s3.put(
        "registry/policy/.claims/v1.json", '{"promotion_id": "someone else"}'
    )  # claimed, nothing copied yet
    pointer = registry.promote(make_candidate(tmp_path / "a", "a"), uri, "policy", GOOD)
    assert pointer["version"] == 2
    assert not s3.list_keys("registry/policy/.claims/v2")  # a committed version's claim is removed
    assert [v["version"] for v in registry.list_versions(uri, "policy")] == [2]
    assert registry.remove_partials(uri, "policy") == [s3.uri("registry/policy/.claims/v1.json")]
    assert registry.promote(make_candidate(tmp_path / "b", "b"), uri, "policy", GOOD)["version"] == 3
