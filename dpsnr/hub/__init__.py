"""What leaves the machine: Hub-ready model folders (`publish`) and their model cards (`model_card`).

Above training in the layering: a card quotes a checkpoint's train_summary.json and the JSON records
of `dpsnr perplexity`, read as files; nothing here imports the evaluation code.
"""
