"""MoE building blocks: router, experts, dispatch, and the MoE block that joins them."""
