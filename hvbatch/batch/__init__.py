"""Batch generation: prompt files in, shards of videos out (`hvbatch.batch.prompts`)."""
