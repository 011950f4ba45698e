"""The rollout path without Ray: typed sample batches, the scheduling-and-ledger state machine, the prompt stream, quarantine records."""
