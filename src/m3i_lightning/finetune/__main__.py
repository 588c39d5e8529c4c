from m3i_lightning.finetune.command import main

main()
