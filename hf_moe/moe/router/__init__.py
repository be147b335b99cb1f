"""Routers: token → expert choice, and the auxiliary losses that keep experts balanced (docs/routing.md).

- `registry`: `ROUTER_CLASSES`, `register_router`, `build_router` (what `config.router_type` names);
- `losses`: expert counts, the switch and sequence load-balancing losses, the z-loss, the bias-balancing rule;
- `topk`: the token-choice top-k router `HfMoeRouter` (the base class of the others) and `SwitchRouter`;
- `expert_choice`: `ExpertChoiceRouter`; `unlearned`: `HashRouter`, `FakeBalancedRouter`;
- `product_key`: `ProductKeyRouter` (N² experts chosen from two halves of N, FlashMoE / PEER) and
  `product_key_top_k`, its exact selection.

Every router returns one [`hf_moe.moe.types.RouterOutput`]. This file imports nothing, so that the config can
import the registry without importing the routers; `import hf_moe` imports (and so registers) the built-in ones.
"""
