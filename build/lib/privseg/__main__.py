from privseg.cli import main

main()
