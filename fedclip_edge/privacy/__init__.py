"""Privacy of updates (docs/privacy.md): differential privacy (`dp`), its accounting
(`accountant`, dp-accounting's RDP and PLD accountants) and the primitives of pairwise-masked
secure aggregation (`secagg`). Pure: no broker, MQTT or processes."""
