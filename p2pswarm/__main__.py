from p2pswarm.cli import main

main()
