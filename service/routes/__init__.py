"""HTTP routes: each translates between HTTP and one call on the service's collaborators."""
