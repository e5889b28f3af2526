from services.deployer.service import main

main()
