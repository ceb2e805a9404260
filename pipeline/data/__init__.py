"""Data for the pipeline: the invented world (`world`), task families, eval partition and checker
(`tasks`), the stage that writes every split (`prepare`), the BPE (`tokenizer`), pretraining token
shards on disk (`shards`) and the LightningDataModules (`datamodules`)."""
