from m3i_lightning.commands.finetune import main

main()
