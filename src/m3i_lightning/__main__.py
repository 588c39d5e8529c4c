from m3i_lightning.commands.pretrain import main

main()
