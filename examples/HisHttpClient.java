// ehc-agent's local HTTP API from Java 11+ (java.net.http, no libraries):
// long-poll for scan events; for each card, POST /v1/use. The same JSON
// objects as the socket protocol (docs/his-protocol.md, "HTTP API").
//
//   javac HisHttpClient.java && java HisHttpClient http://127.0.0.1:7412 /run/ehc-agent/his.token 010101 [--once]
//
// A real HIS parses the JSON with its own library (Jackson, Gson); this
// example picks out the two fields it needs so it compiles anywhere.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

public class HisHttpClient {
    private static final Pattern LAST = Pattern.compile("\"last\":(\\d+)");
    private static final Pattern CARD_SCAN_ID =
        Pattern.compile("\"type\":\"card\",\"scanId\":\"([A-Za-z0-9]+)\"");

    public static void main(String[] args) throws Exception {
        String base = args.length > 0 ? args[0] : "http://127.0.0.1:7412";
        String token = Files.readString(Path.of(args.length > 1 ? args[1] : "/run/ehc-agent/his.token")).strip();
        String scene = args.length > 2 ? args[2] : "010101";
        boolean once = args.length > 3 && args[3].equals("--once");
        HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();
        long after = 0;
        while (true) {
            HttpRequest poll = HttpRequest.newBuilder(URI.create(base + "/v1/events?after=" + after + "&wait=30"))
                .header("Authorization", "Bearer " + token)
                .timeout(Duration.ofSeconds(40))
                .build();
            String body;
            try {
                HttpResponse<String> r = http.send(poll, HttpResponse.BodyHandlers.ofString());
                if (r.statusCode() != 200) {
                    System.err.println("refused: " + r.body());
                    System.exit(1);
                }
                body = r.body();
            } catch (java.io.IOException e) {
                System.err.println("ehc-agent not answering: " + e);
                Thread.sleep(2000);
                continue;
            }
            Matcher last = LAST.matcher(body);
            if (last.find()) {
                after = Long.parseLong(last.group(1));
            }
            Matcher card = CARD_SCAN_ID.matcher(body);
            while (card.find()) {
                String scanId = card.group(1);
                System.out.println("card " + scanId);
                HttpRequest use = HttpRequest.newBuilder(URI.create(base + "/v1/use"))
                    .header("Authorization", "Bearer " + token)
                    .header("Content-Type", "application/json")
                    .POST(HttpRequest.BodyPublishers.ofString(
                        "{\"scanId\":\"" + scanId + "\",\"scene\":\"" + scene + "\"}"))
                    .build();
                String reply = http.send(use, HttpResponse.BodyHandlers.ofString()).body();
                System.out.println(reply);
                if (once) {
                    System.exit(reply.contains("\"type\":\"reply\"") ? 0 : 1);
                }
            }
        }
    }
}
