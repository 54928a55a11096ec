"""preftune's KFP components, importable as Python and loadable from each folder's component.yaml.

>>> from preftune.components import dpo_op, evaluate_op
"""

from preftune.components.champion.component import champion as champion_op
from preftune.components.choose_methods.component import choose_methods as choose_methods_op
from preftune.components.collect.component import collect as collect_op
from preftune.components.compare.component import compare as compare_op
from preftune.components.dpo.component import dpo as dpo_op
from preftune.components.evaluate.component import evaluate as evaluate_op
from preftune.components.fingerprint.component import fingerprint as fingerprint_op
from preftune.components.gate.component import gate as gate_op
from preftune.components.grpo.component import grpo as grpo_op
from preftune.components.ingest.component import ingest as ingest_op
from preftune.components.kto.component import kto as kto_op
from preftune.components.online_dpo.component import online_dpo as online_dpo_op
from preftune.components.ppo.component import ppo as ppo_op
from preftune.components.preference_import.component import preference_import as preference_import_op
from preftune.components.promote.component import promote as promote_op
from preftune.components.refuse_choice.component import refuse_choice as refuse_choice_op
from preftune.components.reward_model.component import reward_model as reward_model_op
from preftune.components.sft.component import sft as sft_op
from preftune.components.skip_method.component import skip_method as skip_method_op

#: Component name (folder under components/) -> component.
COMPONENTS = {
    "fingerprint": fingerprint_op,
    "ingest": ingest_op,
    "preference_import": preference_import_op,
    "sft": sft_op,
    "reward_model": reward_model_op,
    "ppo": ppo_op,
    "grpo": grpo_op,
    "dpo": dpo_op,
    "kto": kto_op,
    "online_dpo": online_dpo_op,
    "evaluate": evaluate_op,
    "gate": gate_op,
    "champion": champion_op,
    "promote": promote_op,
    "collect": collect_op,
    "choose_methods": choose_methods_op,
    "skip_method": skip_method_op,
    "refuse_choice": refuse_choice_op,
    "compare": compare_op,
}

__all__ = [
    "COMPONENTS",
    "champion_op",
    "choose_methods_op",
    "collect_op",
    "compare_op",
    "dpo_op",
    "evaluate_op",
    "fingerprint_op",
    "gate_op",
    "grpo_op",
    "ingest_op",
    "kto_op",
    "online_dpo_op",
    "ppo_op",
    "preference_import_op",
    "promote_op",
    "refuse_choice_op",
    "reward_model_op",
    "sft_op",
    "skip_method_op",
]
