"""KFP component: the current champion of a model in the registry."""

from kfp import dsl

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def champion(registry_uri: str, model_name: str) -> str:
    """Look up the current champion of a registry model; returns its URI, or an empty string when none exists.

    Feed the result to the evaluate step (to compare the candidate with the champion) and to the gate's
    champion_uri (which then requires that comparison).

    Args:
        registry_uri: Registry root: s3://bucket/prefix or a local directory; empty means no registry (no
            champion).
        model_name: Name of the model in the registry.

    Returns:
        Output: The champion's URI, or an empty string before the first promotion.
    """
    from preftune.io.registry import resolve_champion

    if not registry_uri.strip():
        print("no registry configured: no champion to compare with, nothing will be promoted")
        return ""
    uri = resolve_champion(registry_uri, model_name)
    print(f"champion of {model_name}: {uri or '(none yet)'}")
    return uri
