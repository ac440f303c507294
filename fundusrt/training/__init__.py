"""fundusrt.training: fine-tuning (LoRA via peft, or full) and training from scratch (build side: imports torch).

    config     TrainConfig / DataConfig / LoraSettings, read from the JSON file given to `fundusrt train`
    records    LLaVA JSON / InternVL JSONL readers, each problem reported with file and line
    samples    runtime preprocessing (kernels.patchify + prompt.build_input_ids), assistant-only labels, batches
    adapters   what trains (LoRA targets, connector, last vision blocks), adapter save/apply/merge
    trainer    the loop: seeded, resumable, accumulation, cosine warm-up, progress lines, metrics.jsonl
    base       the base held at size: checkpoint dtype (16-bit), fp32 compute over it on CPUs, NF4 (QLoRA)
    distributed  torchrun ranks: DDP / FSDP2, each rank's share of a batch, world-size-free checkpoints
    planner    `fundusrt train CONFIG --plan`: bytes per device, from the checkpoint's config.json alone
    evaluate   accuracy per question type of an exported package, through the runtime
"""
