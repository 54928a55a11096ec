"""KFP component: sample responses from a model and write a batch for human raters."""

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def collect(
    model: Input[Model],
    prompts: str,
    out_uri: str,
    metrics: Output[Metrics],
    k: int = 4,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
    batch_id: str = "",
    max_prompts: int = 0,
) -> str:
    """Sample K responses per prompt from the model and write a labeling batch; returns the batch's URI.

    The batch, under <out_uri>/<batch_id>/, holds ranked.jsonl (raters fill ranks), ratings.jsonl (raters fill
    score and rater), labelstudio_tasks.json with labelstudio_config.xml (a pairwise Label Studio project) and
    manifest.json. Filled-in files and Label Studio JSON exports go back in through the preference import.

    Args:
        model: The policy to sample from (for example the current champion or the newest candidate).
        prompts: URI of prompts to answer (rows with a prompt: text or chat messages; jsonl, csv or parquet).
        out_uri: Where batches go: s3://bucket/prefix or a local directory.
        k: Responses sampled per prompt (at least 2).
        max_new_tokens: Longest response, in tokens.
        temperature: Sampling temperature (above 0, so the K responses differ).
        top_p: Nucleus sampling threshold.
        seed: Seed for sampling and for the left/right order of Label Studio pairs.
        batch_id: Name of the batch folder; empty uses the UTC time (YYYYMMDDTHHMMSSZ).
        max_prompts: Use at most this many prompts (0 = all).

    Returns:
        metrics: Counts of prompts, responses, Label Studio tasks and empty responses.
        Output: The URI of the batch folder, <out_uri>/<batch_id>.
    """
    from preftune.eval.collect import collect as run_collect

    manifest = run_collect(
        model.path,
        prompts,
        out_uri,
        k=k,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_id=batch_id,
        max_prompts=max_prompts,
    )
    from preftune.launch.metrics import log_metrics

    names = ("num_prompts", "num_responses", "num_labelstudio_tasks", "num_empty_responses")
    log_metrics(metrics, {name: manifest[name] for name in names})
    return manifest["uri"]
