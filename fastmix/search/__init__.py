"""The contract between a mixture-search method and the core: the
`MixtureOptimizer` protocol and the `SearchContext` it is handed (`optimizer`),
the objective it minimises (`objective`) and the proxy runs it asks for
(`proxies`). FastMix (`fastmix.fastmix`) and every baseline are typed against it."""
