"""FX graph passes (GraphModule in, GraphModule out) that rewrite linears into MX-quantized subgraphs."""
