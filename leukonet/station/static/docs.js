// The API documentation: Swagger UI from this server (no CDN), reading /openapi.json.
"use strict";
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
});
