from m3i_lightning.cli import main

main()
