"""What a run leaves for people and tools: ``metadata`` (metadata.jsonl and report.json), ``gallery``
(a browsable page), ``export`` (WebDataset shards) and ``progress`` (the live line on a terminal).
"""
