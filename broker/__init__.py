"""fedclip_edge.broker"""
