"""The routed modules and their routing: top-k routers, the balance loss of their outputs, the traditional MoE block,
the btx routed Linear, the shared expert, and the routing statistics kept while a model runs."""
