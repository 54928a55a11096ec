"""KFP component: a fingerprint of the data behind a URI, for cache keys that follow the data."""

from kfp import dsl

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def fingerprint(source: str) -> str:
    """Identify the current contents of a data URI from its listing (S3 ETags, or file sizes and times).

    KFP caches a step by its parameters, and a URI stays the same while the data behind it changes. Passing this
    fingerprint to the ingest steps makes their cache key change exactly when the data does, so a nightly run
    with new data retrains and a rerun on the same data reuses every cached step.

    Args:
        source: URI of the data: a file, a directory, or an s3:// object or prefix.

    Returns:
        Output: A 32-hex-digit fingerprint of the data's listing.
    """
    from preftune.io.storage import fingerprint as data_fingerprint

    return data_fingerprint(source)
