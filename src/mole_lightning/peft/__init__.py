"""Sparse Mixture of LoRA Experts (MoLE) for HF causal LMs: plain LoRA on attention, K routed LoRA experts per MLP.

Typical use on any Llama-family model::

    from mole_lightning.peft import MoLEConfig, apply_mole, collect_aux, routing_mask

    model = apply_mole(AutoModelForCausalLM.from_pretrained(path), MoLEConfig(num_experts=3, rank=32, alpha=64))
    with routing_mask(model, batch["attention_mask"]):
        out = model(**batch)
    loss = out.loss + collect_aux(model).total
"""

from mole_lightning.peft.config import BALANCE_MODES, COMPUTE_IMPLS, MoLEConfig
from mole_lightning.peft.gates import GATES, GateSpec, gate_spec, register_gate
from mole_lightning.peft.inject import (
    DEFAULT_EXCLUDE,
    adapter_parameters,
    adapter_state_dict,
    apply_mole,
    clear_routing,
    collect_aux,
    expert_counts_per_sample,
    iter_routers,
    load_adapter_state_dict,
    routing_mask,
    routing_statistics,
    source_supervision,
)
from mole_lightning.peft.layers import LoRALinear, MoLELinear
from mole_lightning.peft.router import MoLEAux, MoLERouter, RoutingDecision

__all__ = [
    "BALANCE_MODES",
    "COMPUTE_IMPLS",
    "DEFAULT_EXCLUDE",
    "GATES",
    "GateSpec",
    "LoRALinear",
    "MoLEAux",
    "MoLEConfig",
    "MoLELinear",
    "MoLERouter",
    "RoutingDecision",
    "adapter_parameters",
    "adapter_state_dict",
    "apply_mole",
    "clear_routing",
    "collect_aux",
    "expert_counts_per_sample",
    "gate_spec",
    "iter_routers",
    "load_adapter_state_dict",
    "register_gate",
    "routing_mask",
    "routing_statistics",
    "source_supervision",
]
