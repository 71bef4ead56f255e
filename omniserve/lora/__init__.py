"""Serving LoRA adapters over one base model: reading and checking them (``adapter``), which are resident
(``registry``), and applying several in one batch on the transformers engine (``peft_batch``)."""
