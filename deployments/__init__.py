"""Ray deployments of the engine: tensor-parallel shard actors and the runner that drives them."""
