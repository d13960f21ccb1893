"""fedclip_edge.device_agent"""
