from p2pswarm.apps.cli import main

main()
