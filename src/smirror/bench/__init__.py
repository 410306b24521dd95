"""smbench: workloads that model real servers, the metrics of a replication
run (throughput, lag, queues, RSS, CPU), a tuner for the source and target
memory limits, machine-specific sizing advice, and the project's performance
suite with its baselines. The command is ``smbench`` (:mod:`.cli`)."""
