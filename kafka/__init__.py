"""The Kafka log, its projection, the goal contract, intake, results, relay, roles and submit."""
