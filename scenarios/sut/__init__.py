"""Systems under test, one adapter each: our reference HiCache and SGLang's own releases."""
