"""Orchestration: input sources, stages over one shard, runners, the job."""
