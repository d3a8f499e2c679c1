"""onecard: a staged pipeline (download, tokenize, shard, train, evaluate) that pre-trains GPT-2 on one GPU."""
