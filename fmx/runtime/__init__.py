"""The FM at run time: build it with its item table, restore a pinned version's parameters
(no optimizer), encode requests with M-FALCON. Used by the trainer, the logging tier and
serving; never by an expert trainer, which gets FM knowledge only as data."""
