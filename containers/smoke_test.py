"""The runtime image's smoke test: run inside the image by ``containers/image.py smoke`` (``make image``).

Checks what a cluster relies on: preftune, its components and pipelines import; ``pip check`` is clean; the
process is not root; every path a step writes to (home, caches, the KFP launcher's artifact mounts, the working
directory) is writable by the user it runs as (the image's, or an arbitrary UID in group 0); and a preftune
stage runs on 2 workers started with ``python -m torch.distributed.run``. ``--expect-threads N`` also checks
that the thread pools follow the container's CPU quota. Prints one JSON line of what it found; exits non-zero
on the first failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRITABLE = ("HOME", "HF_HOME", "PREFTUNE_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME")
ARTIFACT_MOUNTS = ("/s3", "/minio", "/gcs")


def check_imports() -> dict:
    import kfp
    import torch

    import preftune
    from preftune.components import COMPONENTS
    from preftune.pipelines import PIPELINES

    return {
        "preftune": preftune.__version__,
        "torch": torch.__version__,
        "kfp": kfp.__version__,
        "components": len(COMPONENTS),
        "pipelines": sorted(PIPELINES),
    }


def check_pip() -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"pip check failed:\n{done.stdout}{done.stderr}")


def check_writable() -> list[str]:
    paths = [os.environ[name] for name in WRITABLE] + [*ARTIFACT_MOUNTS, os.getcwd()]
    for path in paths:
        probe = Path(path) / f".smoke-{os.getpid()}"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    return paths


def check_threads(expected: int) -> int:
    import torch

    from preftune.launch import threads

    count = threads.limit_threads()
    if count != expected or torch.get_num_threads() != expected:
        raise SystemExit(
            f"thread count {count} (torch {torch.get_num_threads()}) does not follow the CPU quota: expected "
            f"{expected} (cgroup limit {threads.cgroup_cpu_limit()})"
        )
    return count


def two_worker_stage(tmp: Path) -> dict:
    """SFT on the bundled tiny model for 2 steps, on 2 CPU workers under torchrun (gloo)."""
    from preftune.data.ingest import ingest
    from preftune.launch.distributed import Scale, run_stage
    from preftune.train.sft import SFTConfig

    rows = Path("examples/data/sft.jsonl").read_text(encoding="utf-8").splitlines()[:64]
    source = tmp / "sft.jsonl"
    source.write_text("\n".join(rows) + "\n", encoding="utf-8")
    train, eval_ = tmp / "train", tmp / "eval"
    ingest(
        str(source),
        str(train),
        str(eval_),
        str(tmp / "rejected"),
        str(tmp / "ingest.html"),
        eval_fraction=0.25,
    )
    config = SFTConfig(
        epochs=1, max_steps=2, batch_size=4, eval_batch_size=4, max_length=64, checkpoint_every=0
    )
    start = time.monotonic()
    metrics = run_stage(
        "sft",
        config,
        scale=Scale(num_gpus=2, timeout_seconds=600),
        base_model="examples/tiny-llama",
        train_data=str(train),
        eval_data=str(eval_),
        model_dir=str(tmp / "model"),
        report_path=str(tmp / "report.html"),
    )
    if metrics.get("steps") != 2 or not (tmp / "model" / "lineage.json").is_file():
        raise SystemExit(f"the 2-worker SFT stage did not produce its model: {metrics}")
    return {"workers": 2, "steps": metrics["steps"], "seconds": round(time.monotonic() - start, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the 2-worker training stage")
    parser.add_argument("--expect-threads", type=int, help="the thread count the CPU quota should give")
    args = parser.parse_args()
    found: dict = {"uid": os.getuid(), "gid": os.getgid()}
    if found["uid"] == 0:
        raise SystemExit("the image runs as root")
    found["imports"] = check_imports()
    check_pip()
    found["pip_check"] = "clean"
    found["writable"] = check_writable()
    if args.expect_threads is not None:
        found["threads"] = check_threads(args.expect_threads)
    if not args.quick:
        with tempfile.TemporaryDirectory(prefix="smoke-") as tmp:
            found["torchrun"] = two_worker_stage(Path(tmp))
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
