"""fedclip_edge.exporters"""
