"""Data for the pipeline: the invented world (`world`), task families, eval partition and checker (`tasks`),
hub datasets by adapter (`hub`), the stage that writes every split (`prepare`) and reading them back
(`splits`), the BPE (`tokenizer`), the tokenizer stage (`tokens`), pretraining token shards on disk
(`shards`) and the LightningDataModules (`datamodules`)."""
