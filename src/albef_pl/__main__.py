from albef_pl.cli import main

main()
