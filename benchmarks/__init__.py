"""fedclip_edge.benchmarks"""
