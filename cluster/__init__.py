"""cluster: concept batches on Ray Train (job ledger, packs, checkpoints, retries, publishing)."""
