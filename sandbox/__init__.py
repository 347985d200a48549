"""The simulated cloud: Entra ID, Business Central API v2.0 and Microsoft Graph, served over HTTPS
on localhost for the tests and the demo, plus a helper that runs Azurite for Table/Queue Storage."""
