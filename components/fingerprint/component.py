"""KFP component: a fingerprint of the data behind a URI, for cache keys that follow the data."""

from kfp import dsl

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def fingerprint(source: str) -> str:
    """Identify the current contents of a data URI from its listing (S3 ETags, or file sizes and times).

    KFP caches a step by its parameters, and a URI stays the same while the data behind it changes. Passing this
    fingerprint to the ingest steps makes their cache key change exactly when the data does, so a nightly run
    with new data retrains and a rerun on the same data reuses every cached step. For a Hugging Face dataset
    (hf://) it is the commit the dataset's revision points to.

    Args:
        source: URI of the data: a file, a directory, an s3:// object or prefix, or hf://<dataset id>.

    Returns:
        Output: A 32-hex-digit fingerprint of the data's listing.
    """
    from preftune.data.sources import fingerprint as data_fingerprint

    return data_fingerprint(source)
