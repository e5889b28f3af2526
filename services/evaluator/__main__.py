from services.evaluator.service import main

main()
