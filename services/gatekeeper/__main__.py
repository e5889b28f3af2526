from services.gatekeeper.service import main

main()
