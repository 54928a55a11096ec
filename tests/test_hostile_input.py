"""Hostile input: paths and links that try to write (or read) outside their directory, pickled weights, custom
model code, unsupported URI schemes and out-of-range numbers. Each gets a clear error, and nothing is written
where it must not be."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from s3_server import S3Bucket

from preftune.io import registry, storage
from preftune.model import modeling

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-llama"


def _files(root: Path, *, skip: tuple[str, ...] = ("s3-cache",)) -> list[Path]:
    """Every regular file under ``root`` (the test's tmp_path), except the S3 fixture's cache."""
    return sorted(
        p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and not set(skip) & set(p.parts)
    )


# --------------------------------------------------------------------------------------- paths that escape


@pytest.mark.parametrize(
    "keys",
    [
        ["data/..\\..\\escaped.txt"],  # backslashes: a Windows-style traversal
        ["data/a", "data/a/b"],  # the same name as a file and as a directory (tar's classic)
    ],
    ids=["backslash", "file-and-directory"],
)
def test_s3_keys_that_cannot_be_laid_out_are_refused(s3: S3Bucket, tmp_path: Path, keys: list[str]) -> None:
    s3.put("data/good.txt", "fine")
    for key in keys:
        s3.put(key, "evil")
    with pytest.raises(storage.UnsafePathError, match="escape|both a file and a directory"):
        storage.download(s3.uri("data"), tmp_path / "dest")
    assert _files(tmp_path) == []


def test_a_manifest_cannot_name_a_path_outside(s3: S3Bucket, tmp_path: Path) -> None:
    """The listing is clean; the manifest is the trick: it names files outside the directory."""
    s3.put("data/good.txt", "fine")
    for name in ("../../outside.txt", "/etc/cron.d/evil", "sub/\0nul"):
        body = storage.manifest_bytes({name: storage.FileInfo(4, "0" * 64, "")})
        s3.put("data/_COMPLETE.json", body)
        with pytest.raises(storage.UnsafePathError, match="escape"):
            storage.download(s3.uri("data"), tmp_path / "area" / "dest")
        assert _files(tmp_path) == []
    local = tmp_path / "local-src"
    local.mkdir()
    (local / "good.txt").write_text("fine")
    (local / storage.MANIFEST).write_bytes(
        storage.manifest_bytes({"../x": storage.FileInfo(4, "0" * 64, "")})
    )
    with pytest.raises(storage.UnsafePathError, match="escape"):
        storage.download(str(local), tmp_path / "area" / "dest")
    assert not (tmp_path / "area").exists()


@pytest.fixture
def linked_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A model-like directory with one link to a secret outside it, and the secret."""
    secret = tmp_path / "outside" / "credentials"
    secret.parent.mkdir()
    secret.write_text("aws_secret_access_key = do-not-leak")
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").symlink_to(secret)
    return src, secret


def test_links_out_of_a_source_directory_are_never_followed(
    linked_dir: tuple[Path, Path], s3: S3Bucket, tmp_path: Path
) -> None:
    src, secret = linked_dir
    for call in (
        lambda: storage.download(str(src), tmp_path / "copy"),
        lambda: storage.upload_dir(src, str(tmp_path / "mirror")),
        lambda: storage.upload_dir(src, s3.uri("models/m")),
        lambda: storage.list_files(str(src)),
        lambda: storage.sha256_of(str(src)),
        lambda: registry.promote(str(src), str(tmp_path / "registry"), "policy", {}, merge_adapters=False),
    ):
        with pytest.raises(storage.UnsafePathError, match=r"tokenizer.json: it is a link to .*outside"):
            call()
    assert s3.list_keys() == []
    assert not (tmp_path / "copy").exists() and not (tmp_path / "mirror").exists()
    assert registry.list_versions(str(tmp_path / "registry"), "policy") == []
    leaked = [p for p in _files(tmp_path) if p.read_bytes() == secret.read_bytes() and p != secret]
    assert leaked == []


def test_links_to_directories_are_refused_and_links_inside_are_plain_files(tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "weights").mkdir(parents=True)
    (src / "weights" / "a.bin").write_bytes(b"a")
    (src / "alias.bin").symlink_to(src / "weights" / "a.bin")  # a link inside: its content is copied
    dest = storage.download(str(src), tmp_path / "copy")
    assert (dest / "alias.bin").read_bytes() == b"a" and not (dest / "alias.bin").is_symlink()

    (src / "more").symlink_to(tmp_path)  # a link to a directory: refused, however near it points
    with pytest.raises(storage.UnsafePathError, match="more"):
        storage.download(str(src), tmp_path / "copy2")
    assert not (tmp_path / "copy2").exists()


def test_a_link_in_the_destination_does_not_lead_the_download_out(s3: S3Bucket, tmp_path: Path) -> None:
    s3.put("data/sub/payload.txt", "evil")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(storage.UnsafePathError, match="escape"):
        storage.download(s3.uri("data"), dest)
    assert list(outside.iterdir()) == []


# ----------------------------------------------------------------------------------------- pickled weights


class _Trap:
    """Unpickling this creates ``marker``: what a hostile checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _pickle_trap(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": _Trap(marker)}))


def test_pickle_weights_are_refused_before_they_are_read(tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    (model / "model.safetensors").unlink()
    _pickle_trap(model / "pytorch_model.bin", marker)
    for load in (modeling.load_causal_lm, modeling.load_reward_model):
        with pytest.raises(ValueError, match=r"pytorch_model.bin but no model.safetensors.*safetensors only"):
            load(str(model))
    with pytest.raises(ValueError, match="safetensors only"):
        modeling.prepare_for_training(str(model), use_lora=True)
    # what weights_only=True (the only way anything here may read a .bin/.pt) does with it: refuse, run nothing
    with pytest.raises(pickle.UnpicklingError):
        torch.load(model / "pytorch_model.bin", weights_only=True)
    assert not marker.exists()

    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Trap(armed)))
    assert armed.exists(), "the trap is real: plain unpickling runs it"


def test_an_adapter_with_pickled_weights_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(TINY), "r": 4}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _pickle_trap(adapter / "adapter_model.bin", marker)
    with pytest.raises(ValueError, match=r"adapter_model.bin but no adapter_model.safetensors"):
        modeling.load_causal_lm(str(adapter))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ remote code


def _with_custom_code(tmp_path: Path, marker: Path) -> Path:
    """The tiny model whose config and tokenizer both name custom classes in ``auto_map``."""
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="preftune_untrusted", auto_map={"AutoConfig": "evil.EvilConfig"})
    (model / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    tok_config.update(
        tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}
    )
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return model


def test_custom_model_code_is_not_run_by_default(tmp_path: Path) -> None:
    marker = tmp_path / "remote-code-ran"
    model = _with_custom_code(tmp_path, marker)
    for load in (modeling.load_causal_lm, modeling.load_reward_model, modeling.load_tokenizer):
        with pytest.raises(ValueError, match="trust_remote_code"):
            load(str(model))
    assert not marker.exists()


def test_the_custom_code_trap_is_armed(tmp_path: Path) -> None:
    """With the flag on (in a child process, its module cache in tmp_path) the same directory runs its code:
    the refusal above is the flag's doing, not a broken fixture."""
    marker = tmp_path / "remote-code-ran"
    model = _with_custom_code(tmp_path, marker)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    code = f"from preftune.model.modeling import load_tokenizer\nload_tokenizer({str(model)!r}, trust_remote_code=True)"
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300, check=False)
    assert marker.exists()


def test_trust_remote_code_is_off_everywhere_unless_asked() -> None:
    from preftune.train.dpo import DPOConfig
    from preftune.train.ppo import PPOConfig
    from preftune.train.reward import RewardConfig
    from preftune.train.sft import SFTConfig

    assert [c().trust_remote_code for c in (SFTConfig, DPOConfig, RewardConfig, PPOConfig)] == [False] * 4
    # no component or pipeline exposes it, so no pipeline run can turn it on
    for path in [*ROOT.glob("components/*/component.py"), *ROOT.glob("pipelines/*.py")]:
        assert "trust_remote_code" not in path.read_text(), path


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def test_no_code_loads_pickles_or_trusts_remote_code() -> None:
    """A guard over everything that ships or runs in a pipeline: ``torch.load`` only with ``weights_only=True``
    (and no ``weights_only=False`` anywhere, nor accelerate's ``register_for_checkpointing``, whose state it
    reloads that way); no pickle, dill, joblib or cloudpickle; ``trust_remote_code`` never a literal True."""
    problems = []
    roots = ("src", "components", "pipelines", "benchmarks", "examples")
    files = [p for r in roots for p in (ROOT / r).rglob("*.py") if ".venv" not in p.parts]
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                )
                bad = {n.split(".")[0] for n in names if n} & {
                    "pickle",
                    "dill",
                    "joblib",
                    "cloudpickle",
                    "_pickle",
                }
                if bad:
                    problems.append(f"{where}:{node.lineno}: imports {sorted(bad)}")
        for call in _calls(tree):
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            keywords = {k.arg: k.value for k in call.keywords}
            if (
                name == "load"
                and isinstance(func, ast.Attribute)
                and getattr(func.value, "id", "") == "torch"
            ):
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
            value = keywords.get("weights_only")
            if isinstance(value, ast.Constant) and value.value is False:
                problems.append(f"{where}:{call.lineno}: weights_only=False")
            if name == "register_for_checkpointing":  # accelerate reloads such state with weights_only=False
                problems.append(f"{where}:{call.lineno}: accelerator.register_for_checkpointing")
            value = keywords.get("trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is True:
                problems.append(f"{where}:{call.lineno}: trust_remote_code=True")
    assert problems == []


# ------------------------------------------------------------------------------------------------ URI schemes

BAD_URIS = [
    "http://example.com/data.jsonl",
    "gs://bucket/data",
    "ftp://host/data",
    "hdfs://nn/data",
    "hf://x/y",
]


@pytest.mark.parametrize("uri", BAD_URIS)
def test_unsupported_schemes_are_refused_at_every_entry_point(uri: str, tmp_path: Path) -> None:
    from preftune.data.ingest import ingest
    from preftune.data.preferences import import_preferences
    from preftune.data.records import read_artifact_rows
    from preftune.train.sft import SFTConfig, train_sft

    out = tmp_path / "out"
    local = tmp_path / "src"
    local.mkdir()
    (local / "a.txt").write_text("a")
    entry_points = {
        "storage.check_uri": lambda: storage.check_uri(uri),
        "storage.list_files": lambda: storage.list_files(uri),
        "storage.read_bytes": lambda: storage.read_bytes(uri),
        "storage.write_bytes": lambda: storage.write_bytes(uri, b"x"),
        "storage.download": lambda: storage.download(uri, out),
        "storage.upload_dir": lambda: storage.upload_dir(local, uri),
        "storage.local_path": lambda: storage.local_path(uri, out),
        "storage.read_manifest": lambda: storage.read_manifest(uri),
        "storage.fingerprint": lambda: storage.fingerprint(uri),
        "modeling.resolve": lambda: modeling.resolve(uri),
        "modeling.load_causal_lm": lambda: modeling.load_causal_lm(uri),
        "modeling.load_tokenizer": lambda: modeling.load_tokenizer(uri),
        "ingest": lambda: ingest(uri, *(str(out / n) for n in ("t", "e", "r", "h"))),
        "import_preferences": lambda: import_preferences(uri, *(str(out / n) for n in ("t", "e", "r", "h"))),
        "read_artifact_rows": lambda: read_artifact_rows(uri),
        "registry.list_versions": lambda: registry.list_versions(uri, "policy"),
        "registry.promote": lambda: registry.promote(str(local), uri, "policy", {}, merge_adapters=False),
        "train_sft": lambda: train_sft(
            uri, str(local), str(local), str(out / "m"), str(out / "r"), SFTConfig()
        ),
    }
    if uri.startswith("hf://"):  # a Hugging Face dataset id: the data imports read it, nothing else does
        entry_points = {k: v for k, v in entry_points.items() if k not in ("ingest", "import_preferences")}
    for name, call in entry_points.items():
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert uri in message and "s3://" in message and "file://" in message, (name, message)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- numbers


def _out_of_range(field: dataclasses.Field) -> list[object]:
    """NaN, infinity, and the nearest values outside the range the field's metadata declares."""
    from preftune.config.fields import bounds_of, choices_of

    if choices_of(field):
        return ["no-such-choice"]
    values: list[object] = [math.nan, math.inf]
    bounds = bounds_of(field)
    whole = isinstance(field.default, int)  # None (an optional bound) ranges over floats
    if bounds is not None and bounds.low is not None:
        below = bounds.low - 1 if whole else math.nextafter(bounds.low, -math.inf)
        values.append(below if bounds.low_inclusive else bounds.low)
    if bounds is not None and bounds.high is not None:
        above = bounds.high + 1 if whole else math.nextafter(bounds.high, math.inf)
        values.append(above if bounds.high_inclusive else bounds.high)
    return values


def _stage_checks() -> dict[type, object]:
    from preftune.config.components import VALIDATORS

    return VALIDATORS  # every config and the validate its stage runs first (EvalConfig also on construction)


def test_out_of_range_numbers_are_refused_with_the_field_name() -> None:
    tried = 0
    for cls, check in _stage_checks().items():
        check(cls())  # the defaults are in range
        for field in dataclasses.fields(cls):
            numeric = isinstance(field.default, int | float) and not isinstance(field.default, bool)
            if not (numeric or "bounds" in field.metadata or "choices" in field.metadata):
                continue  # flags and free text
            for value in _out_of_range(field):
                with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field.name} must be"):
                    check(cls(**{field.name: value}))
                tried += 1
    assert tried > 250


def test_a_bad_number_fails_before_anything_is_read_or_written(tmp_path: Path) -> None:
    from preftune.train.dpo import DPOConfig, train_dpo

    with pytest.raises(ValueError, match=r"DPOConfig.lora_dropout must be in \[0, 1\), got 1.5"):
        train_dpo(
            "no/such/model",
            str(tmp_path / "missing.jsonl"),
            str(tmp_path / "missing.jsonl"),
            str(tmp_path / "m"),
            str(tmp_path / "r.html"),
            DPOConfig(lora_dropout=1.5),
        )
    assert list(tmp_path.iterdir()) == []
